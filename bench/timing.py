"""Repeating an action within a time budget, and the statistics the benchmark reports (median, p95)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


class BenchmarkError(RuntimeError):
    """Something broke while measuring (a non-200 answer, a server that would not start): the run fails."""


@dataclass(frozen=True)
class RunPlan:
    """How often to repeat a measurement: at least ``min_runs``, then more until ``budget_seconds`` or ``max_runs``."""

    min_runs: int
    max_runs: int
    budget_seconds: float


@dataclass(frozen=True)
class Samples:
    """Durations of repeated runs of one action, in seconds."""

    seconds: tuple[float, ...]

    @property
    def count(self) -> int:
        """How many runs were timed."""
        return len(self.seconds)

    @property
    def median(self) -> float:
        """The median duration."""
        return statistics.median(self.seconds)

    @property
    def p95(self) -> float:
        """The 95th percentile duration (nearest rank: with fewer than 20 runs, the slowest)."""
        return percentile(self.seconds, 95)


def percentile(values: Sequence[float], rank: float) -> float:
    """The nearest-rank percentile of ``values`` (``rank`` in 0-100]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    return ordered[max(math.ceil(rank / 100 * len(ordered)) - 1, 0)]


def repeat(action: Callable[[], object], plan: RunPlan) -> Samples:
    """Time ``action`` as ``plan`` says; each run is timed on its own with ``time.perf_counter``."""
    durations: list[float] = []
    started = time.perf_counter()
    while len(durations) < plan.max_runs:
        if len(durations) >= plan.min_runs and time.perf_counter() - started >= plan.budget_seconds:
            break
        begin = time.perf_counter()
        action()
        durations.append(time.perf_counter() - begin)
    return Samples(tuple(durations))
