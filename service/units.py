"""Units as data (brief §2): counts to cells/uL, percentages, temperatures to degrees Celsius, all ``Decimal``.

An unknown or missing unit is never guessed: the converters return a problem string instead of a value, and the
result is reported as uninterpretable. So is a count or a temperature outside its plausible range
(``service.thresholds``): such a value is an error in the data, not a measurement to grade.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Generic, TypeVar

from service.thresholds import (
    COUNT_PLAUSIBLE_MAX,
    PERCENT,
    TEMPERATURE_DECIMALS,
    TEMPERATURE_PLAUSIBLE_MAX,
    TEMPERATURE_PLAUSIBLE_MIN,
    THOUSAND_PER_UL,
)

#: Count units to the factor that gives cells/uL (mCODE EquivalentUnits-thousand-per-uL; OHDSI FN cohort).
#: Keys are compared after :func:`normalise` (micro signs -> "u", spaces removed); matching is case-sensitive
#: because case carries meaning in UCUM (``G/L`` giga vs ``g/L`` grams: only counts are looked up here, brief §2).
#: UCUM has both ``L`` and ``l`` for the litre, so ``10*9/l`` and ``/ul`` are the same units as ``10*9/L`` and
#: ``/uL``; "mcL" is the US printed form of the microlitre, and "cumm" the cubic millimetre (= uL): "k/cumm" is the
#: thousands per cubic millimetre of the SMART sample patients the CDS Hooks Sandbox serves. "x10^9/L" is how UK
#: and European laboratories print the brief's 10^9/L ("x10E9/L" as x10E3/uL is printed): not read, a neutrophil
#: count of 0.4 x10^9/L with a fever was uninterpretable, and the emergency was left to the data-quality card.
#: "K/mm3", "10^3/mm3" and "10^6/mL" are the printed forms of the brief's 10*3/mm3 and 10*6/mL.
COUNT_FACTORS: Mapping[str, Decimal] = {
    **dict.fromkeys(
        ("10*3/uL", "10*3/ul", "10*3/mm3", "10*9/L", "10*9/l", "10*6/mL", "10*6/ml", "K/uL", "k/uL", "10^3/uL",
         "x10E3/uL", "x10^3/uL", "thou/uL", "10^9/L", "G/L", "10*3/mcL", "10^3/mcL", "K/mcL", "K/cumm", "k/cumm",
         "10^9/l", "x10^9/L", "x10^9/l", "x10E9/L", "x10*9/L", "K/mm3", "10^3/mm3", "10^6/mL"),
        THOUSAND_PER_UL,
    ),
    **dict.fromkeys(("/uL", "/ul", "/mm3", "{cells}/uL", "cells/uL", "cells/mm3", "/cumm", "/mcL", "cells/mcL"),
                    Decimal(1)),
}  # fmt: skip

#: Units of a "/100 leukocytes" result, to their UCUM code (brief §2: "% (percent codes only)").
PERCENT_UNITS: Mapping[str, str] = {"%": "%", "percent": "%"}
#: Units of the pure-number fraction code 71676-1 (brief §3.1: "fraction 0-1 (no unit)"), which may also come in
#: percent.
FRACTION_UNITS: Mapping[str, str] = {**PERCENT_UNITS, "1": "1"}

CELSIUS, FAHRENHEIT = "Cel", "[degF]"
#: Temperature units: the UCUM codes of the FHIR bodytemp value set and unambiguous printed forms.
TEMPERATURE_UNITS: Mapping[str, str] = {
    **dict.fromkeys(("Cel", "°C", "℃", "degC", "C", "Celsius", "celsius", "degreesC", "degreesCelsius"), CELSIUS),
    **dict.fromkeys(("[degF]", "°F", "℉", "degF", "F", "Fahrenheit", "fahrenheit", "degreesF",
                     "degreesFahrenheit"), FAHRENHEIT),
}

#: Every unit string above: one of them beside a unit of another kind is a contradiction, not free text.
ALL_UNITS = frozenset({*COUNT_FACTORS, *FRACTION_UNITS, *TEMPERATURE_UNITS})
#: Temperature units are compared without regard to case: unlike a count's, no temperature unit's meaning depends
#: on it, and EHRs print "DegC", "DEG F" or "CELSIUS" (one that was not recognised hid the fever it measured).
_TEMPERATURE_UNITS_FOLDED: Mapping[str, str] = {unit.casefold(): code for unit, code in TEMPERATURE_UNITS.items()}

_TWO_PLACES = Decimal(1).scaleb(-TEMPERATURE_DECIMALS)
_M = TypeVar("_M")


def normalise(unit: str) -> str:
    """``unit`` with micro signs spelled ``u`` and whitespace removed."""
    return "".join(unit.replace("\u00b5", "u").replace("\u03bc", "u").split())


def quantity_unit(quantity: Mapping[str, object]) -> tuple[str | None, str | None]:
    """The candidate unit strings of a FHIR Quantity: (UCUM ``code`` if any, printed ``unit`` if any)."""
    return _candidates(quantity.get("code"), quantity.get("unit"))


def _candidates(code: object, unit: object) -> tuple[str | None, str | None]:
    """:func:`quantity_unit` of a Quantity whose ``code`` and ``unit`` are these values."""
    return (
        normalise(code) if isinstance(code, str) and code.strip() else None,
        normalise(unit) if isinstance(unit, str) and unit.strip() else None,
    )


#: Distinct (code, unit) pairs of strings each unit table remembers what it said of. A chart repeats a handful of
#: units in every result, and normalising and looking them up again cost some 1.8 us a result; a request full of
#: invented units only pushes older pairs out.
UNIT_PAIRS_REMEMBERED = 1024
#: Longer strings are looked up every time, never kept: no unit is this long, and a hostile request must not
#: park large strings in the process.
UNIT_LENGTH_REMEMBERED = 64


class _UnitTable(Generic[_M]):
    """A table of units (keys compared after :func:`normalise`, and case-folded with ``fold``) to their meaning.

    What it says of a Quantity depends only on the Quantity's ``code`` and ``unit`` strings, and the table is a
    constant: each pair is worked out once per process (bounded, least recently used pairs go first).
    """

    def __init__(self, table: Mapping[str, _M], *, fold: bool = False) -> None:
        self.table, self.fold = table, fold
        self._meaning = functools.lru_cache(maxsize=UNIT_PAIRS_REMEMBERED)(self._work_out)

    def lookup(self, quantity: Mapping[str, object]) -> tuple[_M | None, str | None]:
        """What the table says the Quantity's unit means, or (None, why).

        The UCUM ``code`` and the printed ``unit`` must not contradict each other, but one that is not a unit we
        know is not a contradiction: the printed unit is free text for people ("degrees C", "DegC" beside
        ``Cel``), and a recognised one of the two is enough. A unit we know of another kind ("%" beside
        ``10*3/uL``) contradicts.
        """
        code, unit = quantity.get("code"), quantity.get("unit")
        # Only strings are units (quantity_unit reads anything else as none), and only short ones are remembered.
        code = code if isinstance(code, str) else None
        unit = unit if isinstance(unit, str) else None
        if len(code or "") > UNIT_LENGTH_REMEMBERED or len(unit or "") > UNIT_LENGTH_REMEMBERED:
            return self._work_out(code, unit)
        return self._meaning(code, unit)

    def _work_out(self, raw_code: str | None, raw_unit: str | None) -> tuple[_M | None, str | None]:
        """:meth:`lookup` of a Quantity whose ``code`` and ``unit`` are these strings (None when absent)."""
        code, unit = _candidates(raw_code, raw_unit)
        if code is None and unit is None:
            return None, "no unit"
        table = self.table
        keys = [None if u is None else u.casefold() if self.fold else u for u in (code, unit)]
        meanings = {table[k] for k in keys if k is not None and k in table}
        foreign = any(u is not None and k not in table and u in ALL_UNITS for u, k in zip((code, unit), keys))
        if len(meanings) > 1 or (meanings and foreign):
            return None, f"conflicting units {code!r} and {unit!r}"
        if not meanings:
            return None, f"unknown unit {code or unit!r}"
        return meanings.pop(), None


_COUNTS = _UnitTable(COUNT_FACTORS)
_PERCENTS = _UnitTable(PERCENT_UNITS)
_FRACTIONS = _UnitTable(FRACTION_UNITS)
_TEMPERATURES = _UnitTable(_TEMPERATURE_UNITS_FOLDED, fold=True)


def count_per_ul(value: Decimal, quantity: Mapping[str, object]) -> tuple[Decimal | None, str | None]:
    """A cell count in cells/uL, or (None, why) for a missing, unknown or conflicting unit or an implausible count."""
    factor, problem = _COUNTS.lookup(quantity)
    if factor is None:
        return None, problem
    count = value * factor
    if count > COUNT_PLAUSIBLE_MAX:
        return None, f"count {count:f}/uL is above the plausible maximum of {COUNT_PLAUSIBLE_MAX}/uL"
    return count, None


def percent(value: Decimal, quantity: Mapping[str, object], *, fraction: bool) -> tuple[Decimal | None, str | None]:
    """A neutrophil share in percent (0-100), from a "%" result or, with ``fraction``, a 0-1 pure number."""
    if fraction and quantity_unit(quantity) == (None, None):
        unit: str | None = "1"  # the fraction code's own unit is the pure number
    else:
        unit, problem = (_FRACTIONS if fraction else _PERCENTS).lookup(quantity)
        if unit is None:
            return None, problem
    if unit == "1":
        if value > 1:
            return None, f"fraction {value} is above 1"
        value = value / PERCENT
    if value > 100:
        return None, f"percentage {value} is above 100"
    return value, None


def celsius(value: Decimal, quantity: Mapping[str, object], *,
            below: bool = False) -> tuple[Decimal | None, str | None]:
    """A body temperature in degrees Celsius rounded to 2 decimals (brief §2), or (None, why) for a missing,
    unknown or conflicting unit or a temperature outside the plausible range (checked after conversion).

    ``below``: the value is a strict upper bound ("<"), rounded up. Rounded half-up, "<38.004" (or "<100.404 °F",
    38.0022) became "<38.00", certainly below 38.0 °C, though the true value may be 38.00-38.003: a bound must
    never come out lower than the one sent. (For "<=" half-up is enough: a bound of 38.0 or more stays 38.00 or
    more, and "<=100.39 °F" stays 37.99.)
    """
    unit, problem = _TEMPERATURES.lookup(quantity)
    if unit is None:
        return None, problem
    result = value if unit == CELSIUS else (value - 32) * 5 / 9
    try:
        degrees = result.quantize(_TWO_PLACES, rounding=ROUND_CEILING) if below else round_celsius(result)
    except InvalidOperation:  # too many digits to round: not a body temperature
        return None, f"value {value} is out of range"
    if not TEMPERATURE_PLAUSIBLE_MIN <= degrees <= TEMPERATURE_PLAUSIBLE_MAX:
        return None, (f"{degrees} °C is outside the plausible body temperature range "
                      f"{TEMPERATURE_PLAUSIBLE_MIN}-{TEMPERATURE_PLAUSIBLE_MAX} °C")
    return degrees, None


def round_celsius(value: Decimal) -> Decimal:
    """``value`` rounded half-up to the 2 decimals used for every temperature comparison (brief §0)."""
    return value.quantize(_TWO_PLACES, rounding=ROUND_HALF_UP)


def fahrenheit_to_celsius(value: Decimal) -> Decimal:
    """Degrees Fahrenheit to degrees Celsius, rounded as for comparison: 100.4 -> 38.00, 101.0 -> 38.33."""
    return round_celsius((value - 32) * 5 / 9)
