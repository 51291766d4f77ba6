"""Placeholder until the neutropenia engine lands (issue 3): no findings, just the evaluation time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Assessment:
    """The result of evaluating one patient's data at ``evaluated_at``."""

    evaluated_at: datetime


def assess(resources: Iterable[Mapping[str, Any]], *, now: datetime) -> Assessment:
    """Evaluate ``resources`` at ``now``."""
    return Assessment(evaluated_at=now)


def assessment_extension(assessment: Assessment) -> dict[str, Any]:
    """The value of the ``org.neutropenia-cds.assessment`` response extension."""
    return {"evaluatedAt": assessment.evaluated_at.strftime("%Y-%m-%dT%H:%M:%SZ")}
