"""Every clinical number lives in service.thresholds with its citation; the configurable ones in ClinicalPolicy."""

from __future__ import annotations

import dataclasses
import inspect
from datetime import timedelta
from decimal import Decimal

import pytest

from service import thresholds
from service.thresholds import DEFAULT_POLICY, ClinicalPolicy, neutropenia_below


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ANC_NORMAL_LOWER", Decimal(1500)),
        ("ANC_MODERATE_BELOW", Decimal(1000)),
        ("ANC_SEVERE_BELOW", Decimal(500)),
        ("ANC_PROFOUND_BELOW", Decimal(100)),
        ("ANC_FALLING_LATEST_BELOW", Decimal(1500)),
        ("NEONATE_NEUTROPENIA_BELOW", Decimal(5000)),
        ("INFANT_NEUTROPENIA_BELOW", Decimal(1000)),
        ("FEVER_SINGLE_READING", Decimal("38.3")),
        ("FEVER_SUSTAINED", Decimal("38.0")),
        ("FEVER_SUSTAINED_DURATION", timedelta(minutes=60)),
        ("TEMPERATURE_DECIMALS", 2),
        ("THOUSAND_PER_UL", Decimal(1000)),
        ("TEMPERATURE_PLAUSIBLE_MIN", Decimal("25.00")),
        ("TEMPERATURE_PLAUSIBLE_MAX", Decimal("45.00")),
        ("COUNT_PLAUSIBLE_MAX", Decimal(2_000_000)),
        ("BIRTH_DATE_TOLERANCE", timedelta(days=1)),
    ],
    ids=lambda v: str(v),
)
def test_threshold_values_match_the_brief(name: str, value: object) -> None:
    assert getattr(thresholds, name) == value


def test_every_module_constant_has_a_comment_citing_its_source() -> None:
    source = inspect.getsource(thresholds)
    for name in [n for n in vars(thresholds) if n.isupper() and n != "DEFAULT_POLICY"]:
        before = source.split(f"\n{name} = ")[0].rsplit("\n\n", 1)[-1]
        assert "#:" in before, f"{name} has no documenting comment"


def test_default_policy_is_the_brief_design() -> None:
    assert DEFAULT_POLICY == ClinicalPolicy(
        anc_current_window=timedelta(days=7),
        temperature_window=timedelta(hours=24),
        fn_anc_cutoff=Decimal(1000),
        gcsf_lookback=timedelta(days=14),
        chemotherapy_lookback=timedelta(days=14),
        future_tolerance=timedelta(minutes=5),
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"anc_current_window": timedelta(0)},
        {"temperature_window": timedelta(hours=-1)},
        {"gcsf_lookback": timedelta(0)},
        {"future_tolerance": timedelta(minutes=-1)},
        {"fn_anc_cutoff": Decimal(0)},
        {"fn_anc_cutoff": Decimal(1501)},
    ],
    ids=["anc-window", "temp-window", "gcsf", "tolerance", "cutoff-zero", "cutoff-above-1500"],
)
def test_policy_refuses_nonsense(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ClinicalPolicy(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides",
    [
        {"future_tolerance": timedelta(0)},
        {"fn_anc_cutoff": Decimal(1)},
        {"fn_anc_cutoff": Decimal(1500)},
        {"anc_current_window": timedelta(microseconds=1)},
    ],
    ids=["tolerance-zero", "cutoff-one", "cutoff-1500", "anc-window-tiny"],
)
def test_policy_accepts_the_edges_of_its_ranges(overrides: dict[str, object]) -> None:
    """A deployment may allow no clock skew, and may set the FN cut-off anywhere in (0, 1500] (CTCAE G2 bound)."""
    policy = ClinicalPolicy(**overrides)  # type: ignore[arg-type]
    assert all(getattr(policy, name) == value for name, value in overrides.items())


def test_policy_is_immutable() -> None:
    """The policy is shared by every request of a worker: no request may change another's cut-offs."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_POLICY.fn_anc_cutoff = Decimal(500)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("years", "days", "expected"),
    [
        (None, None, 1500),
        (0, 0, 5000),
        (0, 6, 5000),
        (0, 7, 5000),  # DESIGN: the gap between the first week and 2 weeks keeps the neonatal cut-off
        (0, 13, 5000),
        (0, 14, 1000),
        (0, 364, 1000),
        (1, 365, 1500),
        (40, 14610, 1500),
        (0, None, 1500),  # half an age is no age: the adult cut-off, as for an unknown one
        (None, 3, 1500),
    ],
    ids=["unknown", "birth", "day6", "day7", "day13", "day14", "day364", "one-year", "adult", "days-unknown",
         "years-unknown"],
)
def test_neutropenia_cutoff_by_age(years: int | None, days: int | None, expected: int) -> None:
    assert neutropenia_below(years, days) == Decimal(expected)
