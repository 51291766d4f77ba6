"""The absolute neutrophil count from lab results (brief §2), one value per specimen/time/report group.

Priority inside a group: (1) a measured ANC code; (2) absolute segmented + band neutrophils; (3) WBC x the total
neutrophil percentage alone (or the 0-1 fraction), else WBC x (segmented % + band %). Results belong to one group
when they share a source, a specimen, an effective time, or a DiagnosticReport/panel. Resources without an id all
cite the same source ("Observation/(no id)"), which says nothing about them belonging together: they group by time,
specimen and links only. Where a group holds several
results for the same role, the lowest is used (conservative).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from service.codes import LabRole
from service.extract import LabResult
from service.fhir import NO_ID
from service.model import DataIssue

PERCENT_ROLES = frozenset({LabRole.TOTAL_PCT, LabRole.FRACTION, LabRole.SEGS_PCT, LabRole.BANDS_PCT})


@dataclass(frozen=True)
class AncValue:
    """One ANC, with how it was obtained."""

    cells_per_ul: Decimal
    comparator: str | None  # "<": the count is below this value; ">": above it
    method: str  # "measured" | "computed"
    formula: str | None
    effective: datetime
    latest: datetime
    status: str
    preliminary: bool
    sources: tuple[str, ...]
    reference_low: Decimal | None = None

    def below(self, cut: Decimal) -> bool:
        """Whether the count is (or, for an upper bound, may be) below ``cut``."""
        return self.cells_per_ul < cut or (self.comparator == "<" and self.cells_per_ul <= cut)


@dataclass(frozen=True)
class TimedIssue:
    """A data issue with the latest time of the results it is about."""

    issue: DataIssue
    latest: datetime


@dataclass(frozen=True)
class AncSeries:
    """Every ANC found, oldest first, and the problems met on the way."""

    values: tuple[AncValue, ...] = ()
    issues: tuple[TimedIssue, ...] = ()


def compute(labs: Iterable[LabResult], links: Iterable[frozenset[str]] = ()) -> AncSeries:
    """The ANC of each group of ``labs`` (grouped by source, specimen, time and ``links``), oldest first."""
    labs = sorted(set(labs), key=LabResult.order)
    values: list[AncValue] = []
    issues = [
        TimedIssue(DataIssue("anc-uninterpretable", lab.source, lab.problem), lab.latest)
        for lab in labs
        if lab.problem is not None
    ]
    for group in _groups(labs, list(links)):
        value, problem = _group_anc(group)
        if value is not None:
            values.append(value)
        elif problem is not None:
            source = min(lab.source for lab in group if lab.value is not None)
            issues.append(TimedIssue(DataIssue("anc-not-computable", source, problem), max(g.latest for g in group)))
    values.sort(key=lambda v: (v.effective, v.latest, v.sources))
    return AncSeries(tuple(values), tuple(sorted(set(issues), key=repr)))


def _groups(labs: list[LabResult], links: list[frozenset[str]]) -> list[list[LabResult]]:
    parent = list(range(len(labs)))

    def find(i: int) -> int:
        """The representative of ``i``'s group (with path halving)."""
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    linked: dict[str, list[int]] = {}
    for number, link in enumerate(links):
        for member in link:
            linked.setdefault(member, []).append(number)
    first: dict[tuple[str, object], int] = {}
    for index, lab in enumerate(labs):
        for key in _keys(lab, linked):
            other = first.setdefault(key, index)
            parent[find(index)] = find(other)
    grouped: dict[int, list[LabResult]] = {}
    for index, lab in enumerate(labs):
        grouped.setdefault(find(index), []).append(lab)
    return list(grouped.values())


def _keys(lab: LabResult, linked: dict[str, list[int]]) -> list[tuple[str, object]]:
    """What puts ``lab`` in one group with another result: its time, source, specimen and links."""
    keys: list[tuple[str, object]] = [("time", lab.effective)]
    keys += [("source", lab.source)] if not lab.source.endswith(NO_ID) else []
    keys += [("specimen", lab.specimen)] if lab.specimen else []
    keys += [("link", number) for number in linked.get(lab.source, ())]
    return keys


class GrowingGroups:
    """The groups of a growing set of results, telling after each batch whether some group now gives an ANC.

    Adding results only merges groups, and a group left untouched by a batch keeps its (absent) ANC, so each batch
    looks again only at the groups it touched: the same answer as computing every prefix (older results can take
    an ANC away by merging into its group, so no prefix may be skipped). A group is held as the lowest usable
    result of each role (by :func:`_rank`, a total order): that is all :func:`_group_anc` reads, so a group that
    grows with every batch (one specimen named for years) is not read whole again, and the search is linear.
    """

    def __init__(self, links: Iterable[frozenset[str]] = ()) -> None:
        self._linked: dict[str, list[int]] = {}
        for number, link in enumerate(links):
            for member in link:
                self._linked.setdefault(member, []).append(number)
        self._parent: list[int] = []
        self._lowest: dict[int, dict[LabRole, LabResult]] = {}
        self._first: dict[tuple[str, object], int] = {}
        self._seen: set[LabResult] = set()

    def _find(self, i: int) -> int:
        while self._parent[i] != i:
            self._parent[i] = self._parent[self._parent[i]]
            i = self._parent[i]
        return i

    def _union(self, a: int, b: int) -> None:
        a, b = self._find(a), self._find(b)
        if a == b:
            return
        self._parent[b] = a
        lowest = self._lowest[a]
        for role, lab in self._lowest.pop(b).items():
            if role not in lowest or _rank(lab) < _rank(lowest[role]):
                lowest[role] = lab

    def add(self, labs: Iterable[LabResult]) -> bool:
        """Add ``labs``; whether a group they touched now gives an ANC."""
        touched: list[int] = []
        for lab in sorted(set(labs) - self._seen, key=LabResult.order):
            self._seen.add(lab)
            index = len(self._parent)
            self._parent.append(index)
            self._lowest[index] = {lab.role: lab} if lab.value is not None else {}
            touched.append(index)
            for key in _keys(lab, self._linked):
                self._union(index, self._first.setdefault(key, index))
        roots = {self._find(index) for index in touched}
        return any(_group_anc(list(self._lowest[root].values()))[0] is not None for root in roots)


def _amount(lab: LabResult) -> Decimal:
    if lab.value is None:  # pragma: no cover - only usable results reach here
        raise ValueError(f"{lab.source} has no interpretable value")
    return lab.value


def _rank(lab: LabResult) -> tuple[object, ...]:
    """Which of two usable results :func:`_lowest` takes: the lower amount, an upper bound ("<") first, then the
    lower source, then ``LabResult.order``. A total order, so the choice never depends on the order results are met
    in (a group held as the lowest result per role, by ``GrowingGroups``, chooses as the whole group does)."""
    return (_amount(lab), lab.comparator != "<", lab.source, lab.order())


def _lowest(group: list[LabResult], *roles: LabRole) -> LabResult | None:
    usable = [lab for lab in group if lab.role in roles and lab.value is not None]
    return min(usable, key=_rank) if usable else None


def _group_anc(group: list[LabResult]) -> tuple[AncValue | None, str | None]:
    measured = _lowest(group, LabRole.ANC)
    if measured is not None:
        return _value([measured], _amount(measured), "measured", None, measured.reference_low)
    segs, bands = _lowest(group, LabRole.SEGS_ABS), _lowest(group, LabRole.BANDS_ABS)
    if segs is not None:
        used = [segs] + ([bands] if bands else [])
        total = sum((_amount(lab) for lab in used), Decimal(0))
        return _value(used, total, "computed", "segs+bands" if bands else "segs", None)
    wbc = _lowest(group, LabRole.WBC)
    share = _lowest(group, LabRole.TOTAL_PCT, LabRole.FRACTION)
    formula = "wbc*total%"
    if share is None:
        segs_pct, bands_pct = _lowest(group, LabRole.SEGS_PCT), _lowest(group, LabRole.BANDS_PCT)
        shares = [lab for lab in (segs_pct, bands_pct) if lab is not None] if segs_pct else []
        formula = "wbc*(segs%+bands%)" if len(shares) == 2 else "wbc*segs%"
    else:
        shares = [share]
    if wbc is not None and shares:
        pct = sum((_amount(lab) for lab in shares), Decimal(0))
        if pct > 100:
            return None, f"neutrophil percentages add up to {pct}%"
        return _value([wbc, *shares], _amount(wbc) * pct / 100, "computed", formula, None)
    roles = {lab.role for lab in group if lab.value is not None}
    if roles & PERCENT_ROLES and wbc is None:
        return None, "neutrophil percentage without a white cell count"
    if roles & PERCENT_ROLES:
        return None, "band percentage without a segmented or total neutrophil percentage"
    if wbc is not None:
        return None, "white cell count without a neutrophil differential"
    if LabRole.BANDS_ABS in roles:
        return None, "band count without a segmented neutrophil count"
    return None, None


def _value(
    used: list[LabResult], cells: Decimal, method: str, formula: str | None, reference_low: Decimal | None
) -> tuple[AncValue | None, str | None]:
    comparators = {lab.comparator for lab in used} - {None}
    if len(comparators) > 1:
        return None, "results bounded in opposite directions (< and >)"
    newest = max(used, key=lambda lab: (lab.effective, lab.latest, lab.status, lab.source))
    preliminary = any(lab.preliminary for lab in used)
    value = AncValue(
        cells_per_ul=cells,
        comparator=comparators.pop() if comparators else None,
        method=method,
        formula=formula,
        effective=max(lab.effective for lab in used),
        latest=max(lab.latest for lab in used),
        status="preliminary" if preliminary else newest.status,
        preliminary=preliminary,
        sources=tuple(sorted({lab.source for lab in used})),
        reference_low=reference_low,
    )
    return value, None
