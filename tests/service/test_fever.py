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
from service.rules import TemperatureState, temperature_state
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


AFEBRILE, ELEVATED, FEVER = TemperatureState.AFEBRILE, TemperatureState.ELEVATED, TemperatureState.FEVER


@pytest.mark.parametrize(
    ("comparator", "value", "expected", "state"),
    [
        # An upper bound certainly below 38.0 °C is a reading below 38.0 °C, "<38.0" included.
        ("<", "37.99", "none", AFEBRILE),
        ("<", "38.0", "none", AFEBRILE),
        # One that leaves it open is not used: no fever made, none ruled out (a data issue says so).
        ("<", "38.01", None, AFEBRILE),
        ("<", "38.29", None, AFEBRILE),
        ("<", "38.3", None, AFEBRILE),
        ("<", "38.31", None, AFEBRILE),
        ("<=", "37.99", "none", AFEBRILE),
        ("<=", "38.0", None, AFEBRILE),
        ("<=", "38.01", None, AFEBRILE),
        ("<=", "38.29", None, AFEBRILE),
        ("<=", "38.3", None, AFEBRILE),
        ("<=", "38.31", None, AFEBRILE),
        # A lower bound of 38.0 °C or more is read at its bound: it can only understate. One below 38.0 °C leaves
        # it open, as an upper bound above it does.
        (">", "37.99", None, AFEBRILE),
        (">", "38.0", "none", ELEVATED),
        (">", "38.01", "none", ELEVATED),
        (">", "38.29", "none", ELEVATED),
        (">", "38.3", "single-reading", FEVER),
        (">", "38.31", "single-reading", FEVER),
        (">=", "37.99", None, AFEBRILE),
        (">=", "38.0", "none", ELEVATED),
        (">=", "38.01", "none", ELEVATED),
        (">=", "38.29", "none", ELEVATED),
        (">=", "38.3", "single-reading", FEVER),
        (">=", "38.31", "single-reading", FEVER),
    ],
    ids=lambda v: str(v),
)
def test_single_reading_with_a_comparator(comparator: str, value: str, expected: str | None,
                                          state: TemperatureState) -> None:
    # "<38.6" was read as 38.6 °C: a single-reading fever, with ANC below 1000 a febrile-neutropenia emergency the
    # data do not show; "<38.0" was read as 38.0 °C, a raised temperature (R3) that was certainly below 38.0 °C.
    found = fever_of(temperature(value, "Cel", ago(minutes=10), comparator=comparator))
    assert (None if found is None else found.criterion, temperature_state(found)) == (expected, state)


@pytest.mark.parametrize(
    ("comparator", "value", "expected"),
    [("<", "100.4", "none"), ("<", "100.41", None), ("<", "100.404", None), ("<=", "100.39", "none"),
     ("<=", "100.4", None), (">", "100.93", "none"), (">", "100.94", "single-reading")],
    ids=["<100.4F=38.00", "<100.41F=38.01", "<100.404F=38.0022", "<=100.39F=37.99", "<=100.4F=38.00",
         ">100.93F=38.29", ">100.94F=38.30"],
)
def test_comparator_bound_is_compared_after_conversion_and_rounding(comparator: str, value: str,
                                                                    expected: str | None) -> None:
    assert criterion(temperature(value, "[degF]", ago(minutes=10), comparator=comparator)) == expected


#: A reading: (value in Cel, comparator or None, minutes ago).
Reading = tuple[str, str | None, int]


@pytest.mark.parametrize(
    ("readings", "expected"),
    [
        ([("38.1", None, 60), ("38.0", "<", 30), ("38.1", None, 0)], "none"),
        ([("38.1", None, 60), ("37.99", "<=", 30), ("38.1", None, 0)], "none"),
        ([("38.1", None, 60), ("38.6", "<", 30), ("38.1", None, 0)], "sustained"),
        ([("38.1", None, 60), ("38.0", "<=", 30), ("38.1", None, 0)], "sustained"),
        ([("38.1", None, 60), ("38.6", "<", 0)], "none"),
        ([("38.0", "<=", 60), ("38.1", None, 0)], "none"),
        ([("38.0", "<", 60), ("38.0", "<", 0)], "none"),
        ([("38.0", ">", 60), ("38.0", None, 0)], "sustained"),
        ([("38.0", ">=", 60), ("37.99", ">", 30), ("38.0", None, 0)], "sustained"),
        ([("38.0", ">=", 60), ("37.99", "<=", 30), ("38.0", None, 0)], "none"),
        # "<38.004" may be 38.00-38.003: rounded half-up to "<38.00" it broke the run, a missed emergency.
        ([("38.1", None, 60), ("38.004", "<", 30), ("38.1", None, 0)], "sustained"),
    ],
    ids=["below-38.0-breaks", "at-most-37.99-breaks", "undecided-neither-breaks", "undecided-at-most-38.0",
         "undecided-cannot-end", "undecided-cannot-start", "two-below-38.0", "lower-bound-starts",
         "lower-bound-below-38.0-neither-breaks", "upper-bound-below-38.0-breaks", "below-38.004-neither-breaks"],
)
def test_sustained_run_with_bounds(readings: list[Reading], expected: str) -> None:
    resources = [temperature(v, "Cel", ago(minutes=m), comparator=c) for v, c, m in readings]
    assert criterion(*resources) == expected


@pytest.mark.parametrize(
    ("instant", "expected"),
    [
        ([("38.0", "<"), ("37.9", None)], "none"),  # the bound is the highest value, yet below 38.0 °C
        ([("38.6", "<"), ("37.9", None)], "none"),  # the undecided bound is not read: 37.9 breaks the run
        ([("37.5", "<"), ("38.1", None)], "sustained"),  # the highest reading counts
        ([("38.0", "<"), ("38.0", None)], "sustained"),  # 38.0 measured, beside a bound of the same value
        ([("38.0", "<"), ("38.3", ">")], "single-reading"),
    ],
    ids=["bound-38.0-with-37.9", "undecided-with-37.9", "bound-37.5-with-38.1", "bound-38.0-with-38.0",
         "bound-with-lower-bound"],
)
def test_same_instant_with_an_upper_bound(instant: list[tuple[str, str | None]], expected: str) -> None:
    # Readings at one instant count as one, the highest; an upper bound is below its bound, so "<38.0" beside
    # 37.9 °C is an instant below 38.0 °C that breaks the run, not a 38.0 °C one that carries it.
    around = [temperature("38.1", "Cel", ago(minutes=m)) for m in (60, 0)]
    at_30 = [temperature(v, "Cel", ago(minutes=30), comparator=c) for v, c in instant]
    assert criterion(*around, *at_30) == expected


@pytest.mark.parametrize(
    ("readings", "expected"),
    [
        ([("u", "37.5", "<", 10)], (D("37.50"), "<", ("Observation/u",))),
        ([("u", "38.0", "<", 10), ("x", "37.2", None, 20)], (D("38.00"), "<", ("Observation/u",))),
        ([("u", "37.5", "<", 10), ("x", "37.5", None, 20)], (D("37.50"), None, ("Observation/x",))),
        ([("u", "37.5", "<", 10), ("v", "37.5", "<=", 10)], (D("37.50"), "<=", ("Observation/u", "Observation/v"))),
        ([("u", "38.6", "<", 10), ("x", "37.2", None, 20)], (D("37.20"), None, ("Observation/x",))),
        ([("l", "38.1", ">", 10), ("x", "37.2", None, 20)], (D("38.10"), None, ("Observation/l",))),
        ([("l", "37.5", ">", 10), ("x", "37.2", None, 20)], (D("37.20"), None, ("Observation/x",))),
    ],
    ids=["upper-bound-only", "upper-bound-highest", "value-equal-to-bound", "below-and-at-most",
         "undecided-not-read", "lower-bound", "lower-bound-below-38.0-not-read"],
)
def test_highest_temperature_is_never_above_an_upper_bound(readings: list[tuple[str, str, str | None, int]],
                                                           expected: tuple[Decimal, str | None,
                                                                           tuple[str, ...]]) -> None:
    # maxCelsius is at most an upper bound; Fever.comparator says when it is only that bound (every reading was
    # below it), so the rules do not read "<38.0" as a raised 38.0 °C.
    found = fever_of(*(temperature(v, "Cel", ago(minutes=m), id=i, comparator=c) for i, v, c, m in readings))
    assert found is not None and found.criterion == "none"
    assert (found.max_celsius, found.comparator, found.sources) == expected


def test_only_undecided_upper_bounds_give_no_fever_result() -> None:
    assert fever_of(temperature("38.6", "Cel", ago(minutes=10), comparator="<"),
                    temperature("38.0", "Cel", ago(minutes=70), comparator="<=")) is None


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


@pytest.mark.parametrize(
    "value",
    ["38.5", "37.6"],
    ids=["fever", "afebrile"],
)
def test_of_equal_hottest_readings_the_latest_is_reported(value: str) -> None:
    """The card gives the time of the hottest reading: of two equal ones the latest, the current state."""
    found = fever_of(temperature(value, "Cel", ago(hours=5), id="early"),
                     temperature(value, "Cel", ago(hours=3), id="late"))
    assert found is not None
    assert (found.sources, found.effective) == (("Observation/late",), NOW.replace(hour=9))


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
