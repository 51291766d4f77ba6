"""The fever rule, exactly as brief §0 states it, over the temperatures of the window.

Fever = any single reading >= 38.3 C, OR consecutive readings all >= 38.0 C whose first and last effective times
are at least 60 minutes apart with no reading < 38.0 C between them. Temperatures are already in degrees Celsius
rounded to 2 decimals (``service.units``). Readings at the same instant count as one reading, the highest
(conservative); only readings timed to an instant can form a sustained run (a date-only reading has no place in a
sequence, nor has a maximum over 1-24 h: brief §3.1 counts it as a single reading), but any reading counts as a
single reading.

A value sent with a comparator is a bound (R4 Quantity.comparator): a lower bound of 38.0 C or more (">38.5") is
read at its bound, which can only understate the fever; an upper bound certainly below 38.0 C ("<38.0", "<=37.9")
is a reading below 38.0 C, even at an instant where its bound is the highest value; a bound that leaves it open
("<38.6", ">=37.9", :attr:`Temperature.undecided`) is not read at all (``service.extract`` reports it as a data
issue).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal

from service import timing
from service.extract import Temperature
from service.model import Fever
from service.thresholds import (
    DEFAULT_POLICY,
    FEVER_SINGLE_READING,
    FEVER_SUSTAINED,
    FEVER_SUSTAINED_DURATION,
    ClinicalPolicy,
)

SINGLE_READING, SUSTAINED, NONE = "single-reading", "sustained", "none"


def in_window(
    temperatures: Iterable[Temperature], *, now: datetime, policy: ClinicalPolicy = DEFAULT_POLICY
) -> list[Temperature]:
    """The readings that may fall inside the temperature window ending at ``now`` (future ones excluded).

    A reading is future when it cannot have begun by ``now`` plus the tolerance (:func:`service.timing.begun_by`:
    a date-only reading may have begun in the earliest time zone, as :mod:`service.extract` also allows).
    """
    start, end = now - policy.temperature_window, now + policy.future_tolerance
    return sorted({t for t in temperatures if t.latest >= start and timing.begun_by(t, end)}, key=Temperature.order)


def assess_fever(
    temperatures: Iterable[Temperature], *, now: datetime, policy: ClinicalPolicy = DEFAULT_POLICY
) -> Fever | None:
    """The fever finding for the window ending at ``now``; None when no usable temperature is in the window."""
    readings = [t for t in in_window(temperatures, now=now, policy=policy) if not t.undecided]
    if not readings:
        return None
    maximum = max(t.celsius for t in readings)
    highest = [t for t in readings if t.celsius == maximum]
    # A reading of the maximum outranks an upper bound equal to it: the maximum is then a value, not a bound.
    known = [t for t in highest if not t.upper_bound]
    hottest = _at_latest_time(known or highest)
    bound = None if known else ("<" if all(t.comparator == "<" for t in highest) else "<=")
    if bound is None and maximum >= FEVER_SINGLE_READING:
        return _fever(maximum, SINGLE_READING, hottest, None, bound)
    run = _latest_sustained_run([t for t in readings if t.precise and not t.maximum])
    if run is not None:
        return _fever(maximum, SUSTAINED, run, run[0].effective, bound)
    return _fever(maximum, NONE, hottest, None, bound)


def _at_latest_time(readings: list[Temperature]) -> list[Temperature]:
    latest = max(t.effective for t in readings)
    return [t for t in readings if t.effective == latest]


def _latest_sustained_run(readings: list[Temperature]) -> list[Temperature] | None:
    """The most recent run of consecutive instants all >= 38.0 C spanning >= 60 minutes, if any."""
    by_time: dict[datetime, list[Temperature]] = {}
    for reading in readings:
        by_time.setdefault(reading.effective, []).append(reading)
    # The run and how far it qualifies, its readings gathered once at the end: gathered at every instant of a long
    # run (a monitor's readings every few seconds), they made this quadratic.
    found: tuple[list[datetime], int] | None = None
    run: list[datetime] = []
    for moment in sorted(by_time):
        # The instant's highest reading: an upper bound ("<38.0") is below 38.0 C whatever its bound.
        if any(t.at_least(FEVER_SUSTAINED) for t in by_time[moment]):
            run.append(moment)
            if run[-1] - run[0] >= FEVER_SUSTAINED_DURATION:
                found = (run, len(run))
        else:
            run = []
    if found is None:
        return None
    moments, length = found
    return [t for m in moments[:length] for t in by_time[m] if t.at_least(FEVER_SUSTAINED)]


def _fever(maximum: Decimal, criterion: str, used: list[Temperature], since: datetime | None,
           comparator: str | None) -> Fever:
    return Fever(
        max_celsius=maximum,
        criterion=criterion,
        effective=max(t.effective for t in used),
        sources=tuple(sorted({t.source for t in used})),
        since=since,
        preliminary=any(t.preliminary for t in used),
        comparator=comparator,
    )
