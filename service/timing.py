"""FHIR date, dateTime, instant and Period values as UTC intervals (pure, no clock).

A value with less than full precision covers an interval: "2025-03-10" is the whole day (in UTC - DESIGN, a date
has no zone), "2025-03" the whole month. ``Timing.effective`` is the start of that interval (so a date-only
result of today is not "in the future") and ``Timing.latest`` its end (so it still counts as recent). Whether a
result lies in the future is asked of :func:`begun_by`, which allows a date to start in the earliest time zone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime, timedelta, timezone
from typing import NamedTuple, Protocol

_PATTERN = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?P<f>\.\d+)?)?(?P<tz>Z|[+-]\d{2}:\d{2}))?)?)?$"
)
#: A FHIR instant (R4 §2.24.0.1: to the second, with a zone), the form nearly every clinical time takes. ``parse``
#: tries this plain pattern first, at a quarter of the cost of ``_PATTERN``'s groups; ASCII digits only, so every
#: value it matches ``_PATTERN`` matches too.
INSTANT = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:Z|[+-][0-9]{2}:[0-9]{2})"
)
_TICK = timedelta(microseconds=1)
#: A leap second ("...:60", allowed by FHIR dateTime/instant and RFC 3339 §5.6) cannot be held by ``datetime``.
_LEAP_SECOND = "60"

#: How long before its UTC start a date (or month, or year) may already have begun somewhere: UTC offsets in use
#: range from -12:00 to +14:00 (UTC+14:00, the Line Islands, is the furthest zone ahead), and a FHIR date has no
#: zone, so "2025-03-11" has begun at UTC+14 by 2025-03-10T10:00Z. A calendar fact, not a clinical threshold.
EARLIEST_ZONE_LEAD = timedelta(hours=14)


class Timing(NamedTuple):
    """When a result applies: ``effective`` is the representative instant, ``latest`` the latest it may be.

    A named tuple rather than a frozen dataclass: one is made for every Observation of a request, and a frozen
    dataclass costs three times as much to construct.
    """

    effective: datetime
    latest: datetime

    @property
    def precise(self) -> bool:
        """Whether the time is a single instant (not a date, month or period)."""
        return self.effective == self.latest


class Timed(Protocol):
    """Anything that keeps a result's time as a ``Timing`` does: a ``Timing``, a lab result, a temperature."""

    @property
    def effective(self) -> datetime: ...

    @property
    def latest(self) -> datetime: ...


def begun_by(when: Timed, limit: datetime) -> bool:
    """Whether ``when`` may have begun by ``limit``: an instant at or before it, a date begun in any time zone.

    A result that has not is future-dated (brief §2). A date, month or year (``effective`` its UTC start, before
    ``latest``) has no zone, so it may have begun up to ``EARLIEST_ZONE_LEAD`` before its UTC start: without
    that, a fever dated with the local date at UTC+10 would be ignored as future from 14:00Z to midnight UTC, and
    febrile neutropenia missed. An instant (also a Period ending at one, see :func:`period`) carries its zone and
    is held to ``limit`` exactly. ``service.extract`` asks this of temperatures only: a lab result dated ahead of
    UTC would outrank a current timed ANC.
    """
    # The plain comparison first: it decides nearly every result (those before ``limit``) without arithmetic.
    return when.effective <= limit or (
        when.effective != when.latest and earlier(when.effective, EARLIEST_ZONE_LEAD) <= limit
    )


def parse(value: object) -> Timing | None:
    """A FHIR date/dateTime/instant string as a UTC ``Timing``; None if it is not one."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if INSTANT.fullmatch(text):
        # The C parser builds the value, as below; what it refuses (a leap second, out of range) goes the long way.
        try:
            moment = datetime.fromisoformat(text).astimezone(timezone.utc)
            return Timing(moment, moment)
        except (ValueError, OverflowError):
            pass
    match = _PATTERN.match(text)
    if match is None:
        return None
    # groups() rather than groupdict(): this runs for every Observation of a request, thousands in a large one.
    y, m, d, hour, minute, second, fraction, zone = match.groups()
    if hour is not None:
        # The pattern has checked the FHIR form; the C parser builds the value (a third of the cost of building
        # it from the groups). It truncates a fraction to microseconds, as below; a leap second (":60") it
        # refuses, and it is read below.
        try:
            moment = datetime.fromisoformat(match.group()).astimezone(timezone.utc)
            return Timing(moment, moment)
        except (ValueError, OverflowError):
            pass  # out of range, or a form this Python's parser lacks: decided from the groups below
    try:
        year, month, day = int(y), int(m or 1), int(d or 1)
        if hour is not None:
            micro = int(fraction[1:7].ljust(6, "0")) if fraction else 0  # truncated to microseconds
            if second == _LEAP_SECOND:
                # A leap second is read as the last instant of its minute (59.999999 s, whatever its fraction),
                # not as 59 s plus the fraction: that keeps the order of the readings (nothing of second 60
                # comes before anything of second 59) and never moves the time into the next minute, day or year.
                second, micro = "59", 999_999
            moment = datetime(
                year, month, day, int(hour), int(minute), int(second or 0), micro, tzinfo=_offset(zone)
            ).astimezone(timezone.utc)
            return Timing(moment, moment)
        start = datetime(year, month, day, tzinfo=timezone.utc)
        if d is not None:
            end = start + timedelta(days=1)
        elif m is not None:
            end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=timezone.utc)
        else:
            end = datetime(year + 1, 1, 1, tzinfo=timezone.utc)
    except (ValueError, OverflowError):
        return None
    return Timing(start, end - _TICK)


def earlier(moment: datetime, span: timedelta) -> datetime:
    """``moment - span``, or the earliest representable instant when that would fall before year 1."""
    try:
        return moment - span
    except OverflowError:
        return datetime.min.replace(tzinfo=timezone.utc)


def _offset(text: str) -> timezone:
    if text == "Z":
        return timezone.utc
    sign = -1 if text[0] == "-" else 1
    hours, minutes = int(text[1:3]), int(text[4:6])
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def period(value: object) -> Timing | None:
    """A FHIR Period: effective at its end (or start when open), latest at the end of its end (or start)."""
    if not isinstance(value, Mapping):
        return None
    start, end = parse(value.get("start")), parse(value.get("end"))
    if end is not None:
        return Timing(end.effective, end.latest)
    return start


def observation_timing(resource: Mapping[str, object]) -> Timing | None:
    """The time an Observation applies: effectiveDateTime, effectiveInstant, effectivePeriod, else issued."""
    # A member sent as null is absent: "effectiveDateTime": null beside a valid issued left the result undated.
    for key in ("effectiveDateTime", "effectiveInstant"):
        if resource.get(key) is not None:
            return parse(resource[key])
    if resource.get("effectivePeriod") is not None:
        return period(resource["effectivePeriod"])
    if resource.get("issued") is not None:
        return parse(resource["issued"])
    return None


def birth_date(value: object) -> date | None:
    """A FHIR date as a ``date`` (the first day of a partial date); None if it is not one."""
    timing = parse(value)
    return None if timing is None else timing.effective.date()


def age(born: date, today: date) -> tuple[int, int]:
    """Completed years and days of age on ``today``; negative days for a birth date in the future."""
    days = (today - born).days
    years = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
    return years, days
