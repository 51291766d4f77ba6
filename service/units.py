"""Units as data (brief §2): counts to cells/uL, percentages, temperatures to degrees Celsius, all ``Decimal``.

An unknown or missing unit is never guessed: the converters return a problem string instead of a value, and the
result is reported as uninterpretable. So is a count or a temperature outside its plausible range
(``service.thresholds``): such a value is an error in the data, not a measurement to grade.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

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
COUNT_FACTORS: Mapping[str, Decimal] = {
    **dict.fromkeys(
        ("10*3/uL", "10*3/mm3", "10*9/L", "10*6/mL", "K/uL", "k/uL", "10^3/uL", "x10E3/uL", "thou/uL",
         "10^9/L", "G/L"),
        THOUSAND_PER_UL,
    ),
    **dict.fromkeys(("/uL", "/mm3", "{cells}/uL", "cells/uL", "cells/mm3", "/cumm"), Decimal(1)),
}  # fmt: skip

#: The only unit a "/100 leukocytes" result may carry (brief §2: "% (percent codes only)").
PERCENT_UNITS = frozenset({"%"})
#: Units accepted on the pure-number fraction code 71676-1 (brief §3.1: "fraction 0-1 (no unit)").
FRACTION_UNITS = frozenset({"", "1"})

#: Temperature units: UCUM codes (FHIR bodytemp value set) and unambiguous printed forms.
CELSIUS_UNITS = frozenset({"Cel", "°C", "℃", "degC", "C"})
FAHRENHEIT_UNITS = frozenset({"[degF]", "°F", "℉", "degF", "F"})

_TWO_PLACES = Decimal(1).scaleb(-TEMPERATURE_DECIMALS)


def normalise(unit: str) -> str:
    """``unit`` with micro signs spelled ``u`` and whitespace removed."""
    return "".join(unit.replace("\u00b5", "u").replace("\u03bc", "u").split())


def quantity_unit(quantity: Mapping[str, object]) -> tuple[str | None, str | None]:
    """The candidate unit strings of a FHIR Quantity: (UCUM ``code`` if any, printed ``unit`` if any)."""
    code = quantity.get("code")
    unit = quantity.get("unit")
    return (
        normalise(code) if isinstance(code, str) and code.strip() else None,
        normalise(unit) if isinstance(unit, str) and unit.strip() else None,
    )


def _lookup(quantity: Mapping[str, object], table: Mapping[str, Decimal]) -> tuple[Decimal | None, str | None]:
    code, unit = quantity_unit(quantity)
    if code is None and unit is None:
        return None, "no unit"
    factors = {table[u] for u in (code, unit) if u is not None and u in table}
    if len(factors) > 1:
        return None, f"conflicting units {code!r} and {unit!r}"
    if not factors:
        return None, f"unknown unit {code or unit!r}"
    return factors.pop(), None


def count_per_ul(value: Decimal, quantity: Mapping[str, object]) -> tuple[Decimal | None, str | None]:
    """A cell count in cells/uL, or (None, why) for a missing, unknown or conflicting unit or an implausible count."""
    factor, problem = _lookup(quantity, COUNT_FACTORS)
    if factor is None:
        return None, problem
    count = value * factor
    if count > COUNT_PLAUSIBLE_MAX:
        return None, f"count {count:f}/uL is above the plausible maximum of {COUNT_PLAUSIBLE_MAX}/uL"
    return count, None


def percent(value: Decimal, quantity: Mapping[str, object], *, fraction: bool) -> tuple[Decimal | None, str | None]:
    """A neutrophil share in percent (0-100), from a "%" result or, with ``fraction``, a 0-1 pure number."""
    code, unit = quantity_unit(quantity)
    units = {u for u in (code, unit) if u is not None} or {""}
    if units <= PERCENT_UNITS:
        result = value
    elif fraction and units <= FRACTION_UNITS:
        if value > 1:
            return None, f"fraction {value} is above 1"
        result = value / PERCENT
    else:
        return None, "no unit" if units == {""} else f"unknown unit {sorted(units)[0]!r}"
    if result > 100:
        return None, f"percentage {result} is above 100"
    return result, None


def celsius(value: Decimal, quantity: Mapping[str, object]) -> tuple[Decimal | None, str | None]:
    """A body temperature in degrees Celsius rounded to 2 decimals (brief §2), or (None, why) for a missing,
    unknown or conflicting unit or a temperature outside the plausible range (checked after conversion)."""
    code, unit = quantity_unit(quantity)
    units = {u for u in (code, unit) if u is not None}
    if not units:
        return None, "no unit"
    if units <= CELSIUS_UNITS:
        result = value
    elif units <= FAHRENHEIT_UNITS:
        result = (value - 32) * 5 / 9
    else:
        return None, f"unknown or conflicting unit {sorted(units)}"
    try:
        degrees = round_celsius(result)
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
