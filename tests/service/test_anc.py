"""The ANC computation (brief §2): measured first, then absolute segs + bands, then WBC x percentage."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import pytest

from service.anc import AncSeries, AncValue, GrowingGroups, compute
from service.extract import extract
from tests.service.factories import (
    ANC_MANUAL,
    BANDS_ABS,
    BANDS_PCT,
    NEUTROPHIL_FRACTION,
    NEUTROPHILS_PCT,
    NOW,
    SEGS_ABS,
    SEGS_PCT,
    ago,
    anc,
    diagnostic_report,
    observation,
    percent,
    wbc,
)

D = Decimal
T0 = ago(hours=2)


def series(*resources: Any) -> AncSeries:
    found = extract(list(resources), now=NOW)
    return compute(found.labs, found.links)


def only(*resources: Any) -> AncValue:
    (value,) = series(*resources).values
    return value


@pytest.mark.parametrize(
    ("resources", "cells", "method", "formula"),
    [
        ([anc(400, "/uL", T0)], "400", "measured", None),
        ([anc("0.4", "10*9/L", T0)], "400", "measured", None),
        ([anc(400, "/uL", T0), wbc(9, effective=T0), percent(NEUTROPHILS_PCT, 80, T0)], "400", "measured", None),
        ([observation(SEGS_ABS, "0.30", "10*9/L", T0), observation(BANDS_ABS, 50, "/uL", T0)], "350", "computed",
         "segs+bands"),
        ([observation(SEGS_ABS, 300, "/uL", T0)], "300", "computed", "segs"),
        # brief §2 worked example: WBC 2.0 x10^3/uL, segs 22 %, bands 4 % -> 520; segs alone 440
        ([wbc("2.0", effective=T0), percent(SEGS_PCT, 22, T0), percent(BANDS_PCT, 4, T0)], "520", "computed",
         "wbc*(segs%+bands%)"),
        ([wbc("2.0", effective=T0), percent(SEGS_PCT, 22, T0)], "440", "computed", "wbc*segs%"),
        ([wbc(2000, "/uL", T0), percent(SEGS_PCT, 22, T0), percent(BANDS_PCT, 4, T0)], "520", "computed",
         "wbc*(segs%+bands%)"),
        # total % is used alone: automated totals already include bands
        ([wbc("2.0", effective=T0), percent(NEUTROPHILS_PCT, 25, T0), percent(BANDS_PCT, 4, T0)], "500", "computed",
         "wbc*total%"),
        ([wbc("2.0", effective=T0), observation(NEUTROPHIL_FRACTION, "0.25", None, T0)], "500", "computed",
         "wbc*total%"),
        ([anc(900, "/uL", T0, code=ANC_MANUAL), anc(950, "/uL", T0)], "900", "measured", None),  # lowest of two
        # percentages adding up to exactly 100 are a differential of neutrophils only: ANC = WBC
        ([wbc(3, effective=T0), percent(SEGS_PCT, 90, T0), percent(BANDS_PCT, 10, T0)], "3000", "computed",
         "wbc*(segs%+bands%)"),
    ],
    ids=["measured", "measured-si", "measured-wins", "segs+bands", "segs-alone", "brief-example", "brief-segs-alone",
         "wbc-per-ul", "total-pct-alone", "fraction", "lowest-measured", "pct-exactly-100"],
)
def test_anc_priority_and_formula(resources: list[Any], cells: str, method: str, formula: str | None) -> None:
    value = only(*resources)
    assert (value.cells_per_ul, value.method, value.formula) == (D(cells), method, formula)


def test_sources_are_recorded() -> None:
    w, s, b = wbc(2, effective=T0, id="w"), percent(SEGS_PCT, 22, T0, id="s"), percent(BANDS_PCT, 4, T0, id="b")
    assert only(w, s, b).sources == ("Observation/b", "Observation/s", "Observation/w")


@pytest.mark.parametrize(
    "link",
    ["specimen", "report", "source"],
)
def test_results_of_one_specimen_or_report_combine_across_times(link: str) -> None:
    specimen: dict[str, Any] = {"specimen": "Specimen/s1"} if link == "specimen" else {}
    w = wbc(2, effective=ago(hours=3), id="w", **specimen)
    p = percent(NEUTROPHILS_PCT, 30, ago(hours=2), id="w" if link == "source" else "p", **specimen)
    extra = [diagnostic_report([w, p])] if link == "report" else []
    value = only(w, p, *extra)
    assert value.cells_per_ul == D(600)
    assert value.effective.isoformat() == "2025-03-10T10:00:00+00:00"
    assert value.latest == value.effective  # the newer result's time, not the older one's


def test_panel_has_member_links_results() -> None:
    w, p = wbc(2, effective=ago(hours=3), id="w"), percent(NEUTROPHILS_PCT, 30, ago(hours=2), id="p")
    panel = observation("57021-8", None, None, T0, id="cbc",
                        hasMember=[{"reference": "Observation/w"}, {"reference": "Observation/p"}])
    assert only(w, p, panel).cells_per_ul == D(600)


def test_results_at_different_times_do_not_combine() -> None:
    found = series(wbc(2, effective=ago(hours=3), id="w"), percent(NEUTROPHILS_PCT, 30, ago(hours=2), id="p"))
    assert found.values == ()
    assert sorted((t.issue.code, t.issue.source, t.issue.detail) for t in found.issues) == [
        ("anc-not-computable", "Observation/p", "neutrophil percentage without a white cell count"),
        ("anc-not-computable", "Observation/w", "white cell count without a neutrophil differential"),
    ]


def _without_id(resource: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in resource.items() if key != "id"}


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        pytest.param([anc(3000, "/uL", ago(days=5)), wbc("1.0", effective=T0), percent(NEUTROPHILS_PCT, 40, T0)],
                     ["3000", "400"], id="old-measured-then-computed"),
        pytest.param([anc(3000, "/uL", ago(days=5)), anc(300, "/uL", T0)], ["3000", "300"], id="two-measured"),
        pytest.param([anc(300, "/uL", ago(days=5)), anc(3000, "/uL", T0)], ["300", "3000"], id="rising"),
        pytest.param([wbc("2.0", effective=ago(hours=3)), percent(NEUTROPHILS_PCT, 30, T0)], [],
                     id="wbc-and-pct-apart"),
    ],
)
def test_results_without_an_id_combine_only_by_time_specimen_or_link(
    resources: list[dict[str, Any]], expected: list[str]
) -> None:
    # Every resource without an id is cited as "Observation/(no id)": that shared citation must not make results
    # of different times one group (a 5-day-old ANC of 3000 hid today's 400 as its group's measured ANC).
    found = series(*(_without_id(r) for r in resources))
    assert [v.cells_per_ul for v in found.values] == [D(c) for c in expected]


@pytest.mark.parametrize(
    ("resources", "detail"),
    [
        ([percent(SEGS_PCT, 40, T0)], "neutrophil percentage without a white cell count"),
        ([wbc(3, effective=T0)], "white cell count without a neutrophil differential"),
        ([wbc(3, effective=T0), percent(BANDS_PCT, 4, T0)],
         "band percentage without a segmented or total neutrophil percentage"),
        ([observation(BANDS_ABS, 50, "/uL", T0)], "band count without a segmented neutrophil count"),
        ([wbc(3, effective=T0), percent(SEGS_PCT, 90, T0), percent(BANDS_PCT, 20, T0)],
         "neutrophil percentages add up to 110%"),
        ([wbc(3, effective=T0), percent(SEGS_PCT, 90, T0), percent(BANDS_PCT, 11, T0)],
         "neutrophil percentages add up to 101%"),
    ],
    ids=["pct-only", "wbc-only", "bands-pct-only", "bands-abs-only", "over-100", "just-over-100"],
)
def test_not_computable(resources: list[Any], detail: str) -> None:
    found = series(*resources)
    assert found.values == ()
    assert [t.issue.detail for t in found.issues] == [detail]


def test_uninterpretable_results_are_reported_and_skipped() -> None:
    found = series(anc(400, None, T0, id="n"), wbc(2, effective=T0), percent(NEUTROPHILS_PCT, 30, T0))
    (value,) = found.values
    assert value.method == "computed"
    assert [(t.issue.code, t.issue.source) for t in found.issues] == [("anc-uninterpretable", "Observation/n")]


def test_percentage_without_percent_unit_is_uninterpretable() -> None:
    found = series(wbc(2, effective=T0), observation(NEUTROPHILS_PCT, 30, None, T0, id="p"))
    assert found.values == ()
    assert {t.issue.code for t in found.issues} == {"anc-uninterpretable", "anc-not-computable"}


def test_comparators() -> None:
    upper = only(anc("0.1", "10*9/L", T0, comparator="<"))
    assert upper.comparator == "<" and upper.below(D(100)) and not upper.below(D(99))
    computed = only(wbc("0.2", effective=T0, comparator="<"), percent(NEUTROPHILS_PCT, 50, T0))
    assert (computed.cells_per_ul, computed.comparator) == (D(100), "<")
    mixed = series(wbc("0.2", effective=T0, comparator="<"), percent(NEUTROPHILS_PCT, 50, T0, comparator=">"))
    assert mixed.values == () and "opposite" in (mixed.issues[0].issue.detail or "")


def test_preliminary_and_status() -> None:
    value = only(wbc(2, effective=T0, status="preliminary"), percent(NEUTROPHILS_PCT, 30, T0, status="corrected"))
    assert (value.status, value.preliminary) == ("preliminary", True)
    # a preliminary result older than the final one it is combined with still makes the ANC preliminary
    older = only(wbc(2, effective=T0, status="final", specimen="Specimen/s1"),
                 percent(NEUTROPHILS_PCT, 30, ago(hours=3), status="preliminary", specimen="Specimen/s1"))
    assert (older.status, older.preliminary) == ("preliminary", True)
    # otherwise the status is the newest result's
    newest = only(wbc(2, effective=T0, status="final", specimen="Specimen/s1"),
                  percent(NEUTROPHILS_PCT, 30, ago(hours=3), status="amended", specimen="Specimen/s1"))
    assert newest.status == "final"
    assert only(anc(400, "/uL", T0, status="amended")).status == "amended"


@pytest.mark.parametrize(
    ("resources", "cells", "comparator"),
    [
        ([anc(500, "/uL", T0, id="a"), anc(500, "/uL", T0, id="b", comparator="<")], "500", "<"),
        ([anc(500, "/uL", T0, id="a", comparator="<"), anc(500, "/uL", T0, id="b")], "500", "<"),
        ([anc(499, "/uL", T0, id="a"), anc(500, "/uL", T0, id="b", comparator="<")], "499", None),
    ],
    ids=["bound-second", "bound-first", "lower-value-wins"],
)
def test_of_two_equal_counts_the_upper_bound_is_used(resources: list[Any], cells: str, comparator: str | None) -> None:
    """'<500' beside '500' in one group is graded severe (< 500): the conservative of the two (_rank)."""
    value = only(*resources)
    assert (value.cells_per_ul, value.comparator) == (D(cells), comparator)
    assert value.below(D(500)) is True


def test_growing_groups_keep_the_lowest_percentage_when_groups_merge() -> None:
    """Segs 95 % + bands 10 % is no ANC (105 %); a later segs 70 % of the same specimen makes one (80 %), as
    compute() over all of them does: merging must keep the lowest result of each role, not the older one."""
    first = extract([wbc(3, effective=T0, id="w", specimen="Specimen/s1"),
                     percent(SEGS_PCT, 95, T0, id="s95", specimen="Specimen/s1"),
                     percent(BANDS_PCT, 10, T0, id="b", specimen="Specimen/s1")], now=NOW).labs
    later = extract([percent(SEGS_PCT, 70, ago(hours=3), id="s70", specimen="Specimen/s1")], now=NOW).labs
    groups = GrowingGroups()
    assert groups.add(first) is False
    assert groups.add(later) is True
    (value,) = compute([*first, *later]).values
    assert value.cells_per_ul == D(2400)


def test_not_computable_group_cites_its_first_source_and_newest_time() -> None:
    found = series(percent(SEGS_PCT, 40, ago(hours=3), id="s", specimen="Specimen/s1"),
                   percent(BANDS_PCT, 5, ago(hours=2), id="b", specimen="Specimen/s1"))
    assert [(t.issue.source, t.latest) for t in found.issues] == [("Observation/b", NOW.replace(hour=10))]


def test_compute_reads_any_iterable_once() -> None:
    found = extract([wbc(2, effective=T0), percent(NEUTROPHILS_PCT, 30, T0)], now=NOW)
    assert compute(iter(found.labs), found.links) == compute(found.labs, found.links)


def test_growing_groups_follow_links_and_ignore_results_seen() -> None:
    """A WBC and a percentage of one DiagnosticReport, an hour apart, give an ANC batch by batch too."""
    w, p = wbc(2, effective=ago(hours=3), id="w"), percent(NEUTROPHILS_PCT, 30, ago(hours=2), id="p")
    found = extract([w, p, diagnostic_report([w, p])], now=NOW)
    groups = GrowingGroups(found.links)
    assert groups.add([lab for lab in found.labs if lab.source == "Observation/w"]) is False
    assert groups.add(found.labs) is True
    assert groups.add(found.labs) is False  # nothing new: no group touched


def test_series_is_oldest_first() -> None:
    found = series(anc(900, effective=ago(days=1)), anc(400, effective=ago(days=3)), anc(600, effective=ago(days=2)))
    assert [v.cells_per_ul for v in found.values] == [D(400), D(600), D(900)]


@pytest.mark.parametrize(
    ("cells", "cut", "below"),
    [(499, 500, True), (500, 500, False), (501, 500, False)],
    ids=["just-below", "at", "just-above"],
)
def test_below_is_strict(cells: int, cut: int, below: bool) -> None:
    assert only(anc(cells, "/uL", T0)).below(D(cut)) is below


def test_anc_values_are_immutable() -> None:
    """An ANC is read by the rules, the cards and the trend at once: none of them may change it for the others."""
    found = series(anc(400, "/uL", T0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.values[0].cells_per_ul = D(4000)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.values = ()  # type: ignore[misc]
