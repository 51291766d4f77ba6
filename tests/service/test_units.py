"""Units to cells/uL, percentages and degrees Celsius (brief §2)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from service.thresholds import COUNT_PLAUSIBLE_MAX, TEMPERATURE_PLAUSIBLE_MAX, TEMPERATURE_PLAUSIBLE_MIN
from service.units import COUNT_FACTORS, celsius, count_per_ul, fahrenheit_to_celsius, percent, round_celsius

D = Decimal


@pytest.mark.parametrize(
    ("unit", "value", "expected"),
    [
        ("10*3/uL", "0.5", "500"),
        ("10*3/mm3", "0.5", "500"),
        ("10*9/L", "0.5", "500"),
        ("10*6/mL", "0.5", "500"),
        ("K/uL", "1.2", "1200"),
        ("k/µL", "1.2", "1200"),
        ("10^3/µL", "1.2", "1200"),
        ("x10E3/uL", "1.2", "1200"),
        ("thou/uL", "1.2", "1200"),
        ("10^9/L", "0.099", "99"),
        ("G/L", "1.5", "1500"),
        ("/uL", "499", "499"),
        ("/mm3", "499", "499"),
        ("{cells}/uL", "499", "499"),
        ("cells/uL", "499", "499"),
        ("/µL", "499", "499"),
        ("/μL", "499", "499"),  # Greek mu, not the micro sign
        ("cells/mm3", "499", "499"),
        ("/cumm", "499", "499"),
        (" 10*9 / L ", "1", "1000"),
        ("10*9/l", "0.5", "500"),  # UCUM's lower-case litre
        ("10*3/ul", "0.5", "500"),
        ("/ul", "499", "499"),
        ("10^3/mcL", "1.2", "1200"),  # US printed microlitre
        ("x10^3/uL", "1.2", "1200"),
        ("cells/mcL", "499", "499"),
        ("k/cumm", "1.2", "1200"),  # SMART sample patients (CDS Hooks Sandbox)
        ("K/cumm", "1.2", "1200"),
        ("x10^9/L", "0.4", "400"),  # UK and European printed form
        ("x10^9/l", "0.4", "400"),
        ("x 10^9 / L", "0.4", "400"),
        ("10^9/l", "0.4", "400"),
        ("x10E9/L", "0.4", "400"),
        ("x10*9/L", "0.4", "400"),
        ("K/mm3", "0.4", "400"),
        ("10^3/mm3", "0.4", "400"),
        ("10^6/mL", "0.4", "400"),
    ],
    ids=lambda v: str(v),
)
def test_count_per_ul_converts_every_listed_unit(unit: str, value: str, expected: str) -> None:
    assert count_per_ul(D(value), {"unit": unit}) == (D(expected), None)


@pytest.mark.parametrize("unit", sorted(COUNT_FACTORS), ids=str)
def test_count_per_ul_accepts_ucum_code_alone(unit: str) -> None:
    converted, problem = count_per_ul(D(1), {"code": unit, "system": "http://unitsofmeasure.org"})
    assert problem is None and converted == COUNT_FACTORS[unit]


@pytest.mark.parametrize(
    ("quantity", "problem"),
    [
        ({}, "no unit"),
        ({"unit": ""}, "no unit"),
        ({"unit": "g/L"}, "unknown unit 'g/L'"),  # grams per litre, not giga
        ({"unit": "mg/dL"}, "unknown unit 'mg/dL'"),
        ({"unit": "%"}, "unknown unit '%'"),
        ({"code": "/uL", "unit": "10*9/L"}, "conflicting units '/uL' and '10*9/L'"),
        ({"code": "10*3/uL", "unit": "%"}, "conflicting units '10*3/uL' and '%'"),
        ({"code": "10*3/uL", "unit": "Cel"}, "conflicting units '10*3/uL' and 'Cel'"),
    ],
    ids=["missing", "empty", "grams-per-litre", "mass", "percent", "conflict", "beside-a-percent-unit",
         "beside-a-temperature-unit"],
)
def test_count_per_ul_never_guesses(quantity: dict[str, str], problem: str) -> None:
    assert count_per_ul(D(1), quantity) == (None, problem)


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ({"code": "10*3/uL", "unit": "thousand per microliter"}, "400.0"),
        ({"code": "10*3/uL", "unit": "K/uL"}, "400.0"),
        ({"code": "{cells}", "unit": "K/uL"}, "400.0"),
    ],
    ids=["printed-free-text", "printed-agrees", "code-unknown-printed-known"],
)
def test_count_per_ul_one_recognised_unit_is_enough(quantity: dict[str, str], expected: str) -> None:
    assert count_per_ul(D("0.4"), quantity) == (D(expected), None)


def test_count_per_ul_code_and_matching_unit_agree() -> None:
    assert count_per_ul(D("0.4"), {"code": "10*3/uL", "unit": "K/uL"}) == (D("400.0"), None)


@pytest.mark.parametrize(
    ("value", "quantity", "fraction", "expected"),
    [
        ("45", {"unit": "%"}, False, ("45", None)),
        ("0", {"unit": "%"}, False, ("0", None)),
        ("100", {"unit": "%"}, False, ("100", None)),
        ("100.1", {"unit": "%"}, False, (None, "percentage 100.1 is above 100")),
        ("45", {}, False, (None, "no unit")),
        ("45", {"unit": "10*9/L"}, False, (None, "unknown unit '10*9/L'")),
        ("45", {"code": "%", "unit": "percent"}, False, ("45", None)),
        ("45", {"code": "%", "unit": "per cent of leukocytes"}, False, ("45", None)),
        ("45", {"code": "%", "unit": "10*9/L"}, False, (None, "conflicting units '%' and '10*9/L'")),
        ("45", {"code": "10*3/uL", "unit": "%"}, False, (None, "conflicting units '10*3/uL' and '%'")),
        ("0.45", {"code": "1", "unit": "%"}, True, (None, "conflicting units '1' and '%'")),
        ("0.45", {"code": "1"}, False, (None, "unknown unit '1'")),  # a % code in '1' is not read as a fraction
        ("0.45", {}, True, ("45", None)),
        ("0.45", {"unit": "1", "code": "1"}, True, ("45", None)),
        ("45", {"unit": "%"}, True, ("45", None)),
        ("1", {}, True, ("100", None)),
        ("1.2", {}, True, (None, "fraction 1.2 is above 1")),
    ],
    ids=["pct", "zero", "hundred", "over-100", "pct-no-unit", "pct-count-unit", "pct-printed-percent",
         "pct-printed-free-text", "pct-printed-a-count-unit", "pct-code-a-count-unit", "fraction-conflict",
         "pct-unit-1",
         "fraction", "fraction-unit-1",
         "fraction-as-pct", "fraction-one", "fraction-over-1"],
)
def test_percent(value: str, quantity: dict[str, str], fraction: bool, expected: tuple[str | None, str | None]) -> None:
    result, problem = percent(D(value), quantity, fraction=fraction)
    assert (result, problem) == (None if expected[0] is None else D(expected[0]), expected[1])


@pytest.mark.parametrize(
    ("fahrenheit", "expected"),
    [
        ("100.4", "38.00"),  # brief: 100.4 F = 38.0 C exactly
        ("101.0", "38.33"),  # 101 F = 38.33 C -> fever on a single reading
        ("100.9", "38.28"),  # just below the single-reading threshold
        ("100.94", "38.30"),  # 38.3000 after rounding
        ("100.93", "38.29"),
        ("100.3", "37.94"),
        ("98.6", "37.00"),
        ("77", "25.00"),
    ],
    ids=lambda v: str(v),
)
def test_fahrenheit_to_celsius_rounds_to_two_decimals(fahrenheit: str, expected: str) -> None:
    assert fahrenheit_to_celsius(D(fahrenheit)) == D(expected)
    assert str(celsius(D(fahrenheit), {"code": "[degF]"})[0]) == expected


def test_fahrenheit_to_celsius_converts_any_number_but_celsius_refuses_implausible_ones() -> None:
    assert fahrenheit_to_celsius(D(32)) == D("0.00")
    assert celsius(D(32), {"code": "[degF]"}) == (
        None, "0.00 °C is outside the plausible body temperature range 25.00-45.00 °C")


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        ("38.3", "Cel", "38.30"),
        ("38.295", "Cel", "38.30"),  # half up
        ("38.294", "Cel", "38.29"),
        ("37.9999", "Cel", "38.00"),
        ("38", "°C", "38.00"),
        ("38", "degC", "38.00"),
        ("101", "°F", "38.33"),
        ("101", "degF", "38.33"),
        ("101", "F", "38.33"),
    ],
    ids=lambda v: str(v),
)
def test_celsius_accepts_ucum_and_printed_units(value: str, unit: str, expected: str) -> None:
    assert celsius(D(value), {"unit": unit}) == (D(expected), None)


@pytest.mark.parametrize(
    ("value", "quantity", "expected"),
    [
        ("38.6", {"unit": "DegC"}, "38.60"),
        ("38.6", {"unit": "DEGC"}, "38.60"),
        ("38.6", {"unit": "deg c"}, "38.60"),
        ("38.6", {"unit": "CELSIUS"}, "38.60"),
        ("38.6", {"unit": "c"}, "38.60"),
        ("38.6", {"code": "cel"}, "38.60"),
        ("101.5", {"unit": "DegF"}, "38.61"),
        ("101.5", {"unit": "f"}, "38.61"),
        ("101.5", {"code": "[DEGF]"}, "38.61"),
    ],
    ids=["DegC", "DEGC", "deg-c", "CELSIUS", "c", "code-cel", "DegF", "f", "code-DEGF"],
)
def test_temperature_units_are_read_in_any_case(value: str, quantity: dict[str, str], expected: str) -> None:
    # No temperature unit's meaning depends on its case; an EHR printing "DegC" alone hid a fever of 38.6.
    assert celsius(D(value), quantity) == (D(expected), None)


def test_count_units_keep_their_case() -> None:
    # For counts case carries meaning: G/L is giga per litre (a count), g/L grams per litre (brief §2).
    assert count_per_ul(D("0.4"), {"unit": "G/L"}) == (D("400.0"), None)
    assert count_per_ul(D("0.4"), {"unit": "g/L"})[0] is None


@pytest.mark.parametrize(
    "quantity",
    [{"unit": "k"}, {"unit": "K"}, {"code": "Cel", "unit": "%"}, {"code": "cel", "unit": "10*3/uL"}],
    ids=["kelvin-lower", "kelvin", "percent-beside", "count-beside"],
)
def test_any_case_never_makes_a_guess(quantity: dict[str, str]) -> None:
    result, problem = celsius(D("38.5"), quantity)
    assert result is None and problem


@pytest.mark.parametrize("value", ["38.5", "101"], ids=["plausible-in-Cel", "plausible-in-degF"])
@pytest.mark.parametrize(
    "quantity",
    [{}, {"unit": "K"}, {"code": "Cel", "unit": "[degF]"}, {"unit": "mmHg"}],
    ids=["missing", "kelvin", "conflict", "pressure"],
)
def test_celsius_never_guesses(quantity: dict[str, str], value: str) -> None:
    # 101 read as [degF] would be a fever (38.33 C): a missing or unknown unit must never fall back to either.
    result, problem = celsius(D(value), quantity)
    assert result is None and problem


@pytest.mark.parametrize(
    ("value", "quantity", "expected"),
    [
        ("38.6", {"system": "http://unitsofmeasure.org", "code": "Cel", "unit": "DegC"}, "38.60"),
        ("38.6", {"system": "http://unitsofmeasure.org", "code": "Cel", "unit": "degrees C"}, "38.60"),
        ("38.6", {"system": "http://unitsofmeasure.org", "code": "Cel", "unit": "Celsius"}, "38.60"),
        ("101.5", {"system": "http://unitsofmeasure.org", "code": "[degF]", "unit": "DEG F"}, "38.61"),
        ("101.5", {"system": "http://unitsofmeasure.org", "code": "[degF]", "unit": "Fahrenheit"}, "38.61"),
        ("38.6", {"unit": "degrees Celsius"}, "38.60"),
        ("101.5", {"unit": "degrees F"}, "38.61"),
    ],
    ids=["cel-DegC", "cel-degrees-C", "cel-Celsius", "degF-DEG-F", "degF-Fahrenheit", "printed-only-celsius",
         "printed-only-fahrenheit"],
)
def test_celsius_takes_a_recognised_code_beside_free_text(value: str, quantity: dict[str, str], expected: str) -> None:
    # Quantity.unit is text for people: an EHR printing "DegC" beside the UCUM code Cel must not hide a fever.
    assert celsius(D(value), quantity) == (D(expected), None)


@pytest.mark.parametrize(
    ("value", "unit", "below", "expected"),
    [
        ("38.004", "Cel", True, "38.01"),  # '<38.004' may be 38.00-38.003: never 'below 38.00'
        ("38.004", "Cel", False, "38.00"),
        ("38.0", "Cel", True, "38.00"),  # an exact bound stays itself
        ("37.991", "Cel", True, "38.00"),  # '<37.991' may be 37.99: rounded up, not half-up to 37.99
        ("100.404", "[degF]", True, "38.01"),  # 38.0022 C
        ("100.3", "[degF]", True, "37.95"),  # 37.944 C
        ("100.3", "[degF]", False, "37.94"),
    ],
    ids=["Cel-bound-up", "Cel-value-half-up", "Cel-exact-bound", "Cel-bound-just-below-38", "degF-bound-up",
         "degF-bound-below-38", "degF-value-half-up"],
)
def test_celsius_rounds_a_strict_upper_bound_up(value: str, unit: str, below: bool, expected: str) -> None:
    assert celsius(D(value), {"code": unit}, below=below) == (D(expected), None)


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ({"code": ["/uL"], "unit": "/uL"}, (D(400), None)),  # a code that is not a string is no unit
        ({"code": "/uL", "unit": {"text": "per uL"}}, (D(400), None)),
        ({"code": "x" * 65}, (None, f"unknown unit {'x' * 65!r}")),  # too long to remember, still looked up
        ({"code": "x" * 64}, (None, f"unknown unit {'x' * 64!r}")),
    ],
    ids=["list-code", "mapping-unit", "65-chars", "64-chars"],
)
def test_count_per_ul_reads_only_strings_of_any_length(quantity: dict[str, object], expected: object) -> None:
    assert count_per_ul(D(400), quantity) == expected


def test_round_celsius_is_half_up() -> None:
    assert round_celsius(D("38.285")) == D("38.29")
    assert round_celsius(D("38.2849")) == D("38.28")


@pytest.mark.parametrize(("value", "unit"), [("1e30", "Cel"), ("123456789012345678901234567890", "[degF]")])
def test_celsius_out_of_range_is_a_problem_not_an_error(value: str, unit: str) -> None:
    result, problem = celsius(D(value), {"code": unit})
    assert result is None and problem is not None and "out of range" in problem


# --- plausibility (service.thresholds DESIGN limits): at, just inside and just outside each boundary -----------


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        ("25.00", "Cel", "25.00"),
        ("25.01", "Cel", "25.01"),
        ("24.99", "Cel", None),
        ("24.995", "Cel", "25.00"),  # rounded first (brief §0), then compared
        ("24.994", "Cel", None),
        ("45.00", "Cel", "45.00"),
        ("44.99", "Cel", "44.99"),
        ("45.01", "Cel", None),
        ("45.004", "Cel", "45.00"),
        ("45.005", "Cel", None),
        ("77", "[degF]", "25.00"),  # the same limits after conversion: 77.00-113.00 °F
        ("77.02", "[degF]", "25.01"),
        ("76.98", "[degF]", None),
        ("113", "[degF]", "45.00"),
        ("112.98", "[degF]", "44.99"),
        ("113.02", "[degF]", None),
        ("98.6", "Cel", None),  # a °F number recorded as Cel: no fever emergency
        ("38.6", "[degF]", None),  # a °C number recorded as [degF] (3.67 °C): no silent all clear
        ("1000", "Cel", None),
        ("-300", "Cel", None),
        ("0", "Cel", None),
    ],
    ids=lambda v: str(v),
)
def test_celsius_plausible_range(value: str, unit: str, expected: str | None) -> None:
    result, problem = celsius(D(value), {"code": unit})
    if expected is None:
        assert result is None and problem is not None and "outside the plausible body temperature range" in problem
    else:
        assert (result, problem) == (D(expected), None)
        assert TEMPERATURE_PLAUSIBLE_MIN <= result <= TEMPERATURE_PLAUSIBLE_MAX


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        ("2000000", "/uL", "2000000"),
        ("1999999", "/uL", "1999999"),
        ("2000001", "/uL", None),
        ("2000", "10*3/uL", "2000000"),
        ("1999.999", "10*3/uL", "1999999"),
        ("2000.001", "10*3/uL", None),
        ("1e9", "10*3/uL", None),  # 10^12/uL
        ("0", "/uL", "0"),
    ],
    ids=lambda v: str(v),
)
def test_count_per_ul_plausible_maximum(value: str, unit: str, expected: str | None) -> None:
    result, problem = count_per_ul(D(value), {"code": unit})
    if expected is None:
        assert result is None and problem == (
            f"count {D(value) * COUNT_FACTORS[unit]:f}/uL is above the plausible maximum of 2000000/uL")
    else:
        assert (result, problem) == (D(expected), None)
        assert result <= COUNT_PLAUSIBLE_MAX
